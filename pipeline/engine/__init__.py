"""The engine: the stage contract, graph building and validation, execution, content-keyed cache, process resources.

It knows no product (reports, chat, the command line) and no stage: both sit on top of it."""
