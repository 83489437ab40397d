from diagnostics.services import audit


class RequestOriginMiddleware:
    """Makes the request's channel, IP and user agent the origin of every audit event the
    services record while serving it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with audit.origin_set(audit.origin_from_request(request)):
            return self.get_response(request)
