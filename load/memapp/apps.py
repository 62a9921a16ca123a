from django.apps import AppConfig


class MemappConfig(AppConfig):
    name = "load.memapp"
    label = "memapp"
    default_auto_field = "django.db.models.BigAutoField"
