"""Models: loading, LoRA wrapping and fine-tuning of the three kinds datainf attributes.

* :mod:`.finetune`  sequence classifiers (transformers + peft) and the fine-tuning loop they share;
* :mod:`.llm`       causal LMs (SmolLM2-135M-Instruct offline), LoRA fine-tuning on chat / prompt-response /
  text data;
* :mod:`.diffusion` a small pre-trained text-conditional UNet, LoRA on its attention, denoising training.
"""
