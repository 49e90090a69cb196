"""The exported smoothed classifier's serving interface: signature names and input key.

The contract between `tf_consreg.export` (which writes the SavedModel) and
its clients (`tf_consreg.serving_client`, `bin/query.py`, TF Serving
requests), kept free of TensorFlow so that a client need not load it.
"""

# CERTIFY: class, certified radius and the bound on the top class's probability.
SERVING_SIGNATURE = "serving_default"
# CERTIFY at one radius per image, estimation samples drawn in stages until
# each image is settled: class, certified, radius and samples.
CERTIFY_RADIUS_SIGNATURE = "certify_radius"
# PREDICT with samples drawn in stages: the class, or abstain, and the samples.
PREDICT_SIGNATURE = "predict"
# The smoothing parameters of the export (sigma, n0, n, alpha, ...).
METADATA_SIGNATURE = "metadata"
# The request's images, float32 [B, H, W, C] in [0, 1].
INPUT_KEY = "images"
# What the image signatures accept, by the export's noise mode (the metadata's
# `noise` and `input_contract`). A grid export samples the exact rounded
# Gaussian on the 8-bit grid (tf_consreg.noise), so each pixel must be one of
# its 256 levels, exactly what `tf.cast(uint8, tf.float32) / 255` and numpy's
# `uint8.astype(np.float32) / np.float32(255)` give; a request with any other
# value is refused (InvalidArgument naming the first bad pixel) before any
# sampling, never rounded.
INPUT_CONTRACTS = {
    "float": "float32 [batch, H, W, C], every pixel in [0, 1]",
    "grid": "float32 [batch, H, W, C], every pixel exactly float32(k) / 255 for an integer k in [0, 255]",
}
# certify_radius's second input: the radius asked of each image, float32 [B].
RADIUS_KEY = "radius"
