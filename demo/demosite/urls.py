from django.urls import path

from demosite import views

urlpatterns = [
    path("product/<int:n>", views.product),
    path("page/<int:n>", views.cached_page),
    path("fragment/<int:n>", views.fragment),
    path("visit", views.visit),
    path("_status", views.status),
]
