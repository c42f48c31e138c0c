"""Scoring segmentations: Dice and HD95 (``metrics``), and whole test sets laid out as the paper's tables."""
