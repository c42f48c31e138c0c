"""What every run needs around the model: the device and precision, progress and cancellation, memory."""
