"""Two ways to send: a dispatcher template (`welcome`) and plain Django mail (`send_mail`)."""

from django.contrib.auth.models import User
from django.core.mail import send_mail
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.views.decorators.csrf import csrf_exempt

from dispatcher.django import enqueue_after_commit


@csrf_exempt
def signup(request: HttpRequest) -> HttpResponse:
    """Create the user and queue the `welcome` template, only if the user is committed."""
    email, name = request.POST.get("email", ""), request.POST.get("name", "")
    if not email or not name:
        return HttpResponseBadRequest("email and name are required")
    with transaction.atomic():
        User.objects.create_user(username=email, email=email, first_name=name)
        enqueue_after_commit(
            "welcome",
            to=f"{name} <{email}>" if name.isalnum() else email,
            context={"name": name, "activate_url": f"https://shop.example.com/activate/{email}"},
        )
    return HttpResponse("welcome mail queued\n", status=201)


@csrf_exempt
def contact(request: HttpRequest) -> HttpResponse:
    """Django's own send_mail, no template: the backend queues it with the dispatcher."""
    message = request.POST.get("message", "")
    if not message:
        return HttpResponseBadRequest("message is required")
    send_mail("Contact form", message, None, ["support@example.com"])
    return HttpResponse("thanks\n")
