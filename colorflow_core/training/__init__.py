"""Training and fine-tuning of ColorFlow (ICP guider + UNet LoRA, GSRP fusion net) into release-layout weights."""
