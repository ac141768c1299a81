"""The program as facts: walking the tree safely (walk), what each Python file declares (pyfacts), indexing it
(indexing: from program_root to the index, with its call graph in callgraph and its store on disk in indexstore),
its docstrings as questions (docstrings), its text as tokens and training pieces (text, lines, corpus)."""
