"""A Flower app (Message API) running fedkern's Scaffnew or TAMUNA (``ScaffnewStrategy`` /
``TamunaStrategy`` on the server, ``MethodClient`` + ``ConvexTrainer`` on the clients) on
label-sorted breast-cancer clients."""
