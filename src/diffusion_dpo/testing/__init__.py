"""Test fixtures that `make-tiny` also writes: tiny pipelines of every family built from config (`tiny`) and a tiny
synthetic preference set in the Pick-a-Pic schema (`tiny_data`). Production code never imports them."""
