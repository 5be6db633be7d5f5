
catalogpage:/p/[0-9]*\?x0