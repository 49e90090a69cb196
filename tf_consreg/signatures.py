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
# certify_radius's second input: the radius asked of each image, float32 [B].
RADIUS_KEY = "radius"
