"""A Flower app (Message API) running fedkern's Byz-VR-MARINA-PP (``ByzVRMarinaPPStrategy`` on
the server, ``ByzVRMarinaClient`` + ``ProblemSampleGradients`` on the clients) on breast-cancer
clients, a few of them Byzantine."""
