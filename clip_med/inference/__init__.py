"""Using a trained model: loading, classification, embeddings, extraction, search and the HTTP service.

``clip_med.load`` (:mod:`clip_med.inference.model`) is the entry point; the submodules are
imported on demand so that, e.g., the search index does not load the HTTP stack.
"""
