"""Image sources: calibration sets, image folders, COCO captions, pixel batches."""
