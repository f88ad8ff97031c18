"""Remote-sensing IO (GeoTIFF windows with CRS/transform/nodata) and transforms."""
