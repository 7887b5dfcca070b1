"""Training: one trainer for pretraining, distillation, continual stages and fine-tuning."""
