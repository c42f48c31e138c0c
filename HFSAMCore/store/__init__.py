"""What is kept between runs: the adapter file format, the model library, verified downloads, sample data."""
