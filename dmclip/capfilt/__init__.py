"""`dmclip capfilt`: BLIP's CapFilt (Li et al., 2022, sec. 3.3) — caption, filter, write a new dataset.

For every image of a (noisy, web-like) image-text set:

- the captioner (BLIP's image-grounded decoder) writes ``num_captions`` synthetic captions, by nucleus
  sampling (top-p 0.9) by default: BLIP found sampling's diversity beats beam search here;
- the filter (BLIP's image-grounded encoder + ITM head) scores every (image, web caption) and (image,
  synthetic caption) pair; pairs under ``threshold`` are dropped (or all but the ``keep_fraction`` best).

Optionally both are first fine-tuned on a small clean set with the training engine, as BLIP does on COCO.

Work is done in shards of ``shard_size`` images. A shard is committed by writing
``<out>/shards/shard-NNNNNN.json`` (its samples, captions and ITM scores) after its images; a rerun with
the same ``--out`` skips committed shards and redoes the rest, so no sample is ever written twice.
The dataset files are then (re)written from all shards in one cheap pass:

    <out>/captions.csv       open_clip layout (filepath, caption): ``csv:<out>/captions.csv``
    <out>/wds/shard-*.tar    with format=wds: ``wds:<out>/wds``
    <out>/images/*.png       the images (exact pixels)
    <out>/manifest.jsonl     per sample: every caption with its source (web/synthetic), ITM score, kept
    <out>/capfilt-state.json what produced the shards (a rerun with other settings is refused)

Because the scores are stored, a rerun with another threshold or keep fraction only re-filters.

Noise removal is scored where the data knows which web captions are wrong (``world-noisy``'s
``caption_is_noisy``): positive = a noisy web caption, predicted positive = removed by the filter
(dmclip.metrics.filtering).

One concern per module:

    config     CapfiltConfig and its sections (captioner, filter, finetune, output)
    scoring    the model check, the three filter scores of a pair, captioning a batch, which pairs are kept
    shards     work shards (resume), the --out directory, the dataset files (webdataset via dmclip.data.export)
    summary    counts, noise removal, the precision-recall plot, report.md
    pipeline   run(config, run_dir): all of it in order, and the optional fine-tuning
"""
