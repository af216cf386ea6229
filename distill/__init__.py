"""distill: teacher -> student knowledge distillation (losses, the combined objective, `python -m distill.run`)."""
