"""Memory and compute accounting: what dual masking saves, and (later) whether a size fits.

`counting` holds the measuring primitives (FLOPs, bytes saved for backward, step time);
`compare` runs the masking variants side by side for `scaling memory compare`.
"""
