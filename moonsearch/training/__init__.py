"""Model-agnostic training building blocks (InfoNCE and false-negative masks, the negative queue,
the unique-item sampler, cross-rank collectives); ``moonsearch.trainer`` is the program that uses them."""
