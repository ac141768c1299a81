"""The steps of pca-pipeline, one module each. A stage imports `pipeline.engine.stage` and `stages.common` only."""
