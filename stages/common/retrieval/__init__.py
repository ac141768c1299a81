"""Which code answers a question: BM25F scoring, MiniLM vectors and their adapter (and its fitting), question sets and
retrieval scoring."""
