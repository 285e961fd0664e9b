"""A Flower app (Message API) running fedkern's compressed-gradient methods (``DianaStrategy`` /
``MarinaStrategy`` / ``Ef21Strategy`` on the server, ``GradientClient`` + ``ConvexGradients`` on
the clients) on label-sorted breast-cancer clients."""
