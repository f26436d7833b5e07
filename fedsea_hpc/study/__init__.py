"""Scaling studies: grids of runs (``fedsea sweep``), their collection (``fedsea report``)."""
