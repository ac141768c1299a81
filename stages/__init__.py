"""The steps of pca-pipeline, one module each. A stage imports `pipeline.stage` and `stages.common` only."""
