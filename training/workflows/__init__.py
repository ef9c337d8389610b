"""The steps behind `evaluate`, `export`, `build-bundle`, `figures` and `check-bundle`, one job per module, as
plain functions the CLI (and tests) call:

    runs.py             a finished run of exactly a config: reused, resumed or trained; its lambda-0 twin
    compare.py          one held-out split, every embedder (the run, its twin, PCA on pixels) -> Comparison
    report.py           a Comparison as the Markdown table and the ROC title
    export_run.py       calibrate on the held-out pairs and write a run as a parity-checked bundle (int8 gate)
    build_bundle.py     the one command: train a recipe and its twin, compare, calibrate, export
    figures.py          the paper's Fig. 3 (2-D features, lambda = 0 beside lambda > 0)
    manifest_recipe.py  RunConfig <-> the manifest's TrainingRecipe, one table used both ways
    check_bundle.py     re-measure a bundle's manifest numbers with its own ONNX model
"""
