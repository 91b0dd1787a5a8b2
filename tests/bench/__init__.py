"""`make bench`: the service's hot paths measured against a bare grpc.aio echo in one run."""
