"""A word-level neural language model whose embedding table trains with jadam.sparse_adam."""
