#!/usr/bin/env bash
# The whole peer benchmark, each method in its own process, ours and the peer back to back.
#   bash benchmarks/peers/run_all.sh            (after setup_peers_venv.sh; prepare.py runs if needed)
set -euo pipefail
cd "$(dirname "$0")"
OURS=../../.venv/bin/python
PEERS=../../.peers-venv/bin/python
WORK=${PEERS_WORK:-../../runs/peers}
[ -f "$WORK/data.json" ] || $OURS prepare.py
run() { echo "== $*"; "$@" > "$WORK/log-$(date +%s%N).txt" 2>&1 || echo "FAILED: $* (see $WORK/log-*.txt)"; }
run $OURS run_ours.py --method exact
run $OURS run_ours.py --method datainf
run $OURS run_ours.py --method ekfac
run $PEERS run_kronfluence.py --strategy ekfac
run $PEERS run_kronfluence.py --strategy ekfac --empirical-fisher --heuristic-damping
run $PEERS run_dattri.py
# pyDVL is left out by default: on the 40-example smoke set it already took 300-520 s (see the docs);
# RUN_PYDVL=1 runs it on the full set (hours on 2 cores).
[ "${RUN_PYDVL:-0}" = 1 ] && run $PEERS run_pydvl.py
run $OURS run_ours.py --method identity
run $PEERS run_kronfluence.py --strategy identity
run $OURS run_ours.py --method kfac
run $OURS run_ours.py --method ekfac-hooks
for rep in 2 3; do  # repeats of the headline pair, back to back
  run $OURS run_ours.py --method ekfac
  run $PEERS run_kronfluence.py --strategy ekfac
done
$OURS summarize.py
