"""`delvm demo`: the whole pipeline on the toy world, with an HTML report."""
