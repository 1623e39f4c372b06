from kdcompress import Pipeline

pipeline = Pipeline("broken")
return pipeline  # noqa: F706
