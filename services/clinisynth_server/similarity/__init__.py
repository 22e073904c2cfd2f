"""Similarity to a model's training images: the memorization gate and the out-of-domain guard.

``features`` is the fixed extractor (pixel thumbnails + appearance embeddings); ``index`` builds,
stores, loads and queries a model's index of its training images.
"""
