"""Training: few-shot fine-tuning on a volume's labeled slices (``fewshot``), and the paper's
whole-dataset regimes (``dataset_training``), sharing one optimisation step, loss and schedule."""
