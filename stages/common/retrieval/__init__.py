"""Which code answers a question: BM25F scoring, MiniLM vectors and their adapter, question sets and retrieval scoring."""
