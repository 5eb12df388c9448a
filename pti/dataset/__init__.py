"""Dataset: trigger words and their new tokens, the TokenEmbeddingsHandler, the dataset folder and the cached
training tensors (root ``dataset_and_utils.py`` is its public face). Imports no other room."""
