"""Quality control of raw inputs: decode-verify core images, validate label tables, report problems."""
