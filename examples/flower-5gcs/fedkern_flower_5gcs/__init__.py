"""A Flower app (Message API) running fedkern's 5GCS / 5GCS-CC (``FiveGCSStrategy`` on the
server, ``FiveGCSClient`` + ``ConvexSolver`` on the clients) with importance sampling on
label-sorted breast-cancer clients."""
