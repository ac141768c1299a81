"""The program as facts: walking the tree safely, what each Python file declares, the typed call graph, the index on disk."""
