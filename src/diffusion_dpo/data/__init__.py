"""Preference data: pairs and their formats (`pairs`: Pick-a-Pic parquet, save_to_disk, hub, JSONL/CSV, in memory),
unpaired like/dislike items (`unpaired`), image decoding and its validation (`images`), the Pick-a-Pic schema
(`schema`)."""
