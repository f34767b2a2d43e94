"""The Pick-a-Pic v2 schema (Kirstain et al. 2023): every column of yuvalkirstain/pickapic_v2, in the order and
types of its parquet shards, and one row of it. What the project writes as preference data (`relabel` and
`iterate`'s pairs, the demo's, the tiny test set) uses it, so that everything reads back as Pick-a-Pic does."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

SCHEMA = pa.schema([
    ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()), ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()), ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("model_0", pa.string()), ("model_1", pa.string()), ("ranking_id", pa.int64()), ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
])


def pickapic_row(caption: str, jpg_0: bytes, jpg_1: bytes, label_0: float, uid_0: str, uid_1: str,
                 created_at: dt.datetime, ranking_id: int, user_id: int, model_0: str, model_1: str,
                 url_0: str = "", url_1: str = "") -> dict:
    """One row of SCHEMA. label_1 and best_image_uid (empty for a tie) follow from label_0 (1, 0 or 0.5)."""
    return {
        "are_different": True, "best_image_uid": "" if label_0 == 0.5 else (uid_0 if label_0 == 1.0 else uid_1),
        "caption": caption, "created_at": created_at, "has_label": True,
        "image_0_uid": uid_0, "image_0_url": url_0, "image_1_uid": uid_1, "image_1_url": url_1,
        "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": float(label_0), "label_1": 1.0 - float(label_0),
        "model_0": model_0, "model_1": model_1, "ranking_id": ranking_id, "user_id": user_id,
        "num_example_per_prompt": 1,
    }
