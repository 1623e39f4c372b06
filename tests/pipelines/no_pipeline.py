from kdcompress import Pipeline, models
from kdcompress.stages import train

my_pipeline = Pipeline("misnamed")
my_pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
