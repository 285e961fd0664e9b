"""A Flower app (Message API) that trains on scikit-learn's digits with fedkern's robust
aggregation (``FedkernStrategy``) and compressed client updates (``make_compress_mod``)."""
