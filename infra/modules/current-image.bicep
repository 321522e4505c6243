// On re-provision, keep the image azd deployed last; before the first deploy, a public placeholder runs.
param exists bool
param appName string

resource existingApp 'Microsoft.App/containerApps@2024-03-01' existing = if (exists) {
  name: appName
}

output image string = exists ? existingApp.properties.template.containers[0].image : 'mcr.microsoft.com/azuredocs/containerapps-helloworld:latest'
