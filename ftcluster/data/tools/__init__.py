"""`ftcluster data`: checks and clean-ups of a data file before it costs GPU hours.

One module per job: validate (schema), stats (token lengths under the training tokenizer and template),
dedup (exact and MinHash near-duplicates), scrub (personal and secret data), contamination (eval overlapping
train), split (a seeded train/eval split). They read with ftcluster.data.formats, so every format training
reads works here, and write with ftcluster.data.tools.output, in the input's own format.
"""
