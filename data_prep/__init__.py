"""Dataset preparation: the built-in synthetic generator and raw Amazon data to MMRec format."""
