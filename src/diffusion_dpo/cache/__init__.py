"""The pre-encoding cache and the precomputed reference table: every pair's images as VAE posteriors and every caption as text-encoder outputs,
encoded once, then read memory-mapped by training, which never loads the VAE or the text encoders.

    diffusion-dpo cache --config configs/sd15_pickapic.yaml --cache.dir cache/pickapic-sd15
    diffusion-dpo train --config configs/sd15_pickapic.yaml --cache.dir cache/pickapic-sd15

Layout of `cache.dir` (safetensors shards, opened lazily with `safe_open`, so only the rows a batch
needs are paged in):

    manifest.json            what it was made with (see `cache_identity`) and its shapes
    images-00000.safetensors every distinct image once (same bytes, same image), in order of first use:
        mean, std            (m, V, C, h, w)     VAE posterior; V orientations ([as is] or [as is, flipped]
                                                 with data.random_flip)
        crop_top_lefts       (m, V, 2)           SDXL crop offsets as seen after the flip
        original_sizes       (m, 2)              the image's (h, w) before resizing
        key                  (m, 16)             blake2b digest of the encoded image (a resumed build's lookup)
    pairs-00000.safetensors  `cache.shard_pairs` pairs each, in pair order:
        image                (n, 2)              rows of the image table, winner first (1 per unpaired item)
        caption              (n,)                row of the caption table
        label                (n,)                1 for a decided pair, 0.5 for a kept tie
    text-00000.safetensors   unique captions (row 0 is the empty prompt): the model family's per-prompt encodings
                             (`Family.encode_prompt`): SD hidden (m, 77, D); SDXL hidden, pooled; SD3 clip
                             (m, 77, 2048), pooled, t5 (m, L, 4096) unless model.t5 false; FLUX pooled, t5

Why an image table: an image is often in several pairs (`iterate`'s every-two-of-K pairing puts each sample in
K - 1 of them, 7 at K = 8; Pick-a-Pic repeats images too), and each is encoded and stored once. Caches of format
2 (each pair holding its two posteriors) are still read.

Why posterior parameters and not latents: the posterior sample is drawn per pair and epoch from the
pair's sample seed (`randomness.pair_noise`) with the same formula as on the fly (`models.sample_latents`),
so a cached run stays stochastic and equals an uncached one up to float noise. Why both orientations: a
VAE is not flip-equivariant, so the flipped image is encoded too. Random crops are refused: a crop drawn
per pair and epoch has too many positions to pre-encode exactly. Captions are deduplicated (Pick-a-Pic v2
has ~15x fewer unique captions than pairs); the empty-prompt swap is drawn at train time
(`randomness.item_draws`) and picks row 0.

The cache is written as `<dir>.tmp/` and renamed when complete, so a killed build never leaves a cache
that looks usable. The build is cut into chunks of `cache.shard_pairs` pairs, images and captions that do not depend
on the number of processes (`build`): under `accelerate launch` every process encodes its share, and a killed build
continues, on any number of processes, after the chunks already written, with the bytes of an uninterrupted one.

Modules: `store` (the format: manifest, `Cache`, `CachedPairs`, a cached batch's inputs), `build`
(writing a cache), `identity` (what a cache and a reference table depend on; the refusal of a mismatch),
`fingerprint` (cheap fingerprints of model folders and data files), `reference` (the precomputed reference),
`chunks` (chunk files written whole, and the plan that decides whether an interrupted build's chunks are kept).
"""
