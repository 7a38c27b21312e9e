"""Camera rigs and the static BEV-to-camera layouts precomputed from them."""
