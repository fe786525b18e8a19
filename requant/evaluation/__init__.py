"""GSM8K evaluation through lm-eval, the statistics that compare two variants, and the report."""
