"""absl flag definitions shared by train.py and evaluate.py; recipes are the *.cfg flagfiles here."""
