
catalog(